"""Names shared by every part of the package: classes, stains and missing-modality scenarios."""

from __future__ import annotations

#: HER2 scores in label order; ``label`` in a datalist is the index into this tuple.
CLASS_NAMES: tuple[str, ...] = ("0", "1+", "2+", "3+")
NUM_CLASSES: int = len(CLASS_NAMES)

#: Stain keys used in datalists, batches and model inputs. Column ``i`` of an availability mask refers to ``STAINS[i]``.
HE_KEY = "he"
IHC_KEY = "ihc"
STAINS: tuple[str, ...] = (HE_KEY, IHC_KEY)
MASK_KEY = "mask"
LABEL_KEY = "label"
#: Batch key of inference records: 1 where the record declared its stains, 0 where the branch selector decides.
STAIN_KNOWN_KEY = "stain_known"
#: ``label`` of a record without a HER2 score (e.g. MIST pairs, used only to train the stain translation).
UNLABELLED = -1

#: Branch-selector classes: index 0 is H&E, index 1 is HER2-IHC.
STAIN_CLASS_NAMES: tuple[str, ...] = ("he", "ihc")

#: Missing-modality scenarios. ``SCENARIOS[i]`` is the name of scenario id ``i``.
DUAL, HE_ONLY, IHC_ONLY = 0, 1, 2
SCENARIOS: tuple[str, ...] = ("dual", "he_only", "ihc_only")


def label_from_score(score: str) -> int:
    """Map a HER2 score string (``"0"``, ``"1+"``, ``"2+"``, ``"3+"``; ``"1"`` etc. also accepted) to its label index.

    Args:
        score: the score as written in a BCI file name or a report.

    Returns:
        The integer label in ``0..3``.

    Raises:
        ValueError: if ``score`` is not a HER2 score.
    """
    text = str(score).strip()
    if text in CLASS_NAMES:
        return CLASS_NAMES.index(text)
    if text in ("1", "2", "3"):
        return int(text)
    raise ValueError(f"'{score}' is not a HER2 score; expected one of {', '.join(CLASS_NAMES)}")

"""A MONAI Label app that serves the HER2 bundle to pathologists (optional extra ``label``).

This folder *is* the MONAI Label app: ``main.py`` defines the :class:`~monailabel.interfaces.app.MONAILabelApp`
subclass. Start it with::

    monailabel start_server --app "$(python -m her2_monai.label_app)" --studies DIR \\
        --conf bundle_path bundle --host 127.0.0.1 --port 8000

Importing this package does not import MONAI Label; only ``main``, ``tasks`` and ``server`` need it (see
``docs/monai_label.md`` for the install).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["APP_DIR"]

#: The app folder to give to ``monailabel start_server --app``.
APP_DIR = Path(__file__).resolve().parent

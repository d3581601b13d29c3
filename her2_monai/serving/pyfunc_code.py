"""The MLflow "models from code" file of :class:`~her2_monai.serving.mlflow_model.HER2PyfuncModel`.

``mlflow.pyfunc.log_model(python_model=<this file>)`` copies this file into the model; loading the model runs it, and
it names the model object with :func:`mlflow.models.set_model`. Nothing is pickled: the model's code is her2-monai's,
installed in the environment that loads it (the model's ``requirements.txt`` says where from).
"""

from __future__ import annotations

import mlflow

from her2_monai.serving.mlflow_model import HER2PyfuncModel

mlflow.models.set_model(HER2PyfuncModel())

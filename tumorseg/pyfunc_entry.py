"""MLflow "models from code" entry: MLflow runs this file when it loads a tumorseg model.

It is copied into the model folder at logging time; nothing in tumorseg imports it.
"""

import warnings

from mlflow.models import set_model

warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)

from tumorseg.mlflow_model import TumorsegPyfunc  # noqa: E402

set_model(TumorsegPyfunc())

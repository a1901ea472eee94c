"""MLflow "models from code" entry: MLflow runs this file when it loads a tumorseg model.

It is copied into the model folder at logging time; nothing in tumorseg imports it.
"""

from mlflow.models import set_model

from tumorseg.mlflow_model import TumorsegPyfunc

set_model(TumorsegPyfunc())

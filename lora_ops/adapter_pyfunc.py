"""An adapter as an MLflow pyfunc model: the served class and the model folder it lives in.

Loaded, the model holds the base with the adapter on: prompts in, greedy replies out.

The registry logs every adapter in this form, so ``mlflow.pyfunc.load_model(
"models:/adapter-<customer>@production")`` (or ``mlflow models serve``) answers prompts with
no lora-ops code beyond an installed package. The model is logged *from code* (a three-line
script naming :class:`AdapterPyfunc`), not cloudpickled, so loading it unpickles nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import save_model
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from lora_ops.errors import InputError
from lora_ops.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

log = logging.getLogger(__name__)

ARTIFACT_KEY = "adapter"  # the key of the PEFT folder in the pyfunc's artifacts
DEFAULT_MAX_NEW_TOKENS = 64

# One unnamed string column: MLflow then accepts a list of prompts, a DataFrame with a
# `prompt` column and a {"prompt": ...} dict alike (a named column refuses plain lists).
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]),
)
INPUT_EXAMPLE = ["Hello!"]

# The models-from-code script written beside the model: MLflow runs it at load time.
ENTRY_SCRIPT = (
    "from mlflow.models import set_model\n"
    "from lora_ops.adapter_pyfunc import AdapterPyfunc\n"
    "set_model(AdapterPyfunc())\n"
)


class AdapterPyfunc(PythonModel):
    """Greedy chat replies from the base model named in the adapter, with the adapter on."""

    def load_context(self, context: PythonModelContext) -> None:
        """Load the base named by ``base_model_name_or_path`` and switch the adapter on."""
        from lora_ops.adapters import load_adapted  # transformers: only where a model loads

        adapter_dir = Path(context.artifacts[ARTIFACT_KEY])
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        base = config["base_model_name_or_path"]
        log.info("loading base %s with the adapter in %s", base, adapter_dir)
        self.model, self.tokenizer = load_adapted(base, adapter_dir)

    def predict(
        self,
        context: PythonModelContext | None,
        # MLflow hands over a DataFrame (SIGNATURE's one column); a direct call may pass a list
        # or a dict too. The DataFrame hint also keeps MLflow from re-deriving the signature.
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[str]:
        """One greedy reply per prompt.

        Args:
            context: unused (the model was loaded in ``load_context``).
            model_input: a list of prompt strings, a DataFrame with a ``prompt`` column (or a
                single column), or a dict with ``"prompt"`` (a string or a list of them).
            params: ``max_new_tokens`` (default 64).

        Returns:
            The replies, in the order of the prompts.
        """
        from lora_ops.adapters import ADAPTER_NAME
        from lora_ops.generation import generate_reply

        max_new_tokens = int((params or {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        return [
            generate_reply(
                self.model,
                self.tokenizer,
                [{"role": "user", "content": prompt}],
                max_new_tokens=max_new_tokens,
                adapter=ADAPTER_NAME,
            )
            for prompt in prompts_of(model_input)
        ]


def prompts_of(model_input: Any) -> list[str]:
    """The prompt strings in any input form :meth:`AdapterPyfunc.predict` accepts."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        if "prompt" not in model_input:
            raise ValueError(f"a dict input needs a 'prompt' key, got {sorted(model_input)}")
        return prompts_of(model_input["prompt"])
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a pandas DataFrame
        if "prompt" in columns:
            column = model_input["prompt"]
        elif len(columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"a DataFrame input needs a 'prompt' column, got {list(columns)}")
        return _flat_strings(column.tolist())
    if isinstance(model_input, list | tuple):
        return _flat_strings(model_input)
    raise ValueError(f"cannot read prompts from a {type(model_input).__name__}")


def _flat_strings(values: Any) -> list[str]:
    # MLflow turns {"prompt": ["a", "b"]} into a one-row DataFrame holding the list.
    flat: list[str] = []
    for value in values:
        if isinstance(value, list | tuple) or getattr(value, "ndim", 0) == 1:
            flat.extend(str(item) for item in value)
        else:
            flat.append(str(value))
    return flat


def check_adapter_dir(adapter_dir: Path) -> Path:
    """Refuse a folder that is not a loadable PEFT adapter naming its base model."""
    _, raw = read_adapter_config(adapter_dir)
    if not (adapter_dir / WEIGHTS_NAME).is_file():
        raise InputError(f"no {WEIGHTS_NAME} in the adapter folder", file=adapter_dir)
    if not raw.get("base_model_name_or_path"):
        raise InputError(
            "is empty: the served model loads this base", file=adapter_dir, field="base_model"
        )
    return adapter_dir


def _pip_requirements() -> list[str]:
    try:
        return [f"lora-ops=={metadata.version('lora-ops')}"]
    except metadata.PackageNotFoundError:
        return ["lora-ops"]


def save_pyfunc_model(tmp: Path, adapter_dir: Path, mlflow_model: Model) -> Path:
    """Write the pyfunc model folder of an adapter under ``tmp``; returns the folder.

    Only the two PEFT files travel (no checkpoints or optimizer state beside them), under
    ``artifacts/adapter``. Explicit pip requirements: inferring them loads the model. The
    input example is only checked against the signature: no model is loaded here.

    Args:
        tmp: an empty scratch folder.
        adapter_dir: the PEFT folder (see :func:`check_adapter_dir`).
        mlflow_model: the MLmodel record to fill (ids of the LoggedModel and the run).
    """
    staged = tmp / "stage" / ARTIFACT_KEY
    staged.mkdir(parents=True)
    for file_name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy2(adapter_dir / file_name, staged / file_name)
    entry = tmp / "stage" / "adapter_model.py"
    entry.write_text(ENTRY_SCRIPT, encoding="utf-8")
    local = tmp / "model"
    save_model(
        path=str(local),
        python_model=str(entry),
        artifacts={ARTIFACT_KEY: str(staged)},
        signature=SIGNATURE,
        input_example=INPUT_EXAMPLE,
        pip_requirements=_pip_requirements(),
        mlflow_model=mlflow_model,
    )
    return local


def adapter_path_in(model_dir: Path) -> str:
    """The PEFT folder's path inside a pyfunc model folder, from its MLmodel file."""
    flavor = Model.load(str(model_dir)).flavors["python_function"]
    return str(flavor["artifacts"][ARTIFACT_KEY]["path"])


def peft_folder_in(model_dir: Path) -> Path:
    """The PEFT folder of a downloaded model (or ``model_dir`` itself if it is one)."""
    if (model_dir / CONFIG_NAME).is_file():
        return model_dir
    if (model_dir / "MLmodel").is_file():
        folder = model_dir / adapter_path_in(model_dir)
        if (folder / CONFIG_NAME).is_file():
            return folder
    found = sorted(path.parent for path in model_dir.rglob(CONFIG_NAME))
    if len(found) != 1:
        raise InputError(
            f"expected one {CONFIG_NAME} in the model, found {len(found)}", file=model_dir
        )
    return found[0]

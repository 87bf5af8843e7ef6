"""Two tables of transformers' `AutoTokenizer`, read from its source file instead of importing it.

`tokenizer_loader.tokenizers_backend_for` needs `TOKENIZER_MAPPING_NAMES` (the tokenizer class
transformers registers for a model type) and `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS` to know
whether `AutoTokenizer.from_pretrained(folder)` would build a `TokenizersBackend`. Importing the
module that holds them (`transformers.models.auto.tokenization_auto`) imports its config and
modeling machinery: torch in every transformers 5, and in 5.17 also torch._dynamo,
torch.distributed.tensor, the generation utilities and accelerate. That is 1.5-2.5 s of imports
holding the GIL on an idle CPU (far more on a GPU host with triton and friends installed), on the
thread that loads the server's tokenizer while the server imports its HTTP stack, where the
tokenizer needs none of it. Parsing the file (56 KB) takes milliseconds and imports nothing.

The tables are plain literals there: a list of `(model_type, class_name)` pairs whose class is
`"X" if is_tokenizers_available() else None` (Mistral's: `"MistralCommonBackend" if
is_mistral_common_available() else (...)`), and a set of strings. Conditions are evaluated with
transformers' own `is_*_available` functions (cheap: `import transformers` loads them, and the
tokenizer's class import needs that anyway). Anything else in an entry reads as `UNKNOWN`, and a
file whose tables are not found reads as None: the caller then lets AutoTokenizer decide.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

UNKNOWN = object()  # an entry whose class this reader cannot work out

_SOURCE = os.path.join("models", "auto", "tokenization_auto.py")  # inside the transformers package
_MAPPING = "TOKENIZER_MAPPING_NAMES"
_INCORRECT_HUB_CLASS = "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS"

Availability = Callable[[str], Optional[bool]]  # `is_x_available` -> its answer, None if no such function


@dataclass(frozen=True)
class AutoTokenizerTables:
    class_for_model_type: dict[str, Union[str, None, object]]  # None: no class; UNKNOWN: see above
    models_with_incorrect_hub_class: frozenset[str]


@functools.lru_cache(maxsize=None)
def auto_tokenizer_tables() -> Optional[AutoTokenizerTables]:
    """The installed transformers' tables, or None (no transformers, or a file laid out otherwise)."""
    try:
        spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), _SOURCE)
    try:
        with open(path, encoding="utf-8") as f:
            return tables_from_source(f.read(), transformers_availability)
    except (OSError, SyntaxError, ValueError):
        return None


def transformers_availability(name: str) -> Optional[bool]:
    """What transformers' `name` (e.g. `is_mistral_common_available`) answers here."""
    try:
        from transformers.utils import import_utils
    except ImportError:
        return None
    function = getattr(import_utils, name, None)
    if not callable(function):
        return None
    try:
        return bool(function())
    except Exception:  # noqa: BLE001 - an answer we cannot get is an unknown class
        return None


def tables_from_source(source: str, available: Availability) -> Optional[AutoTokenizerTables]:
    """The tables as `tokenization_auto.py`'s source `source` writes them, None where not found;
    `available` answers the `is_*_available()` conditions in them."""
    mapping, incorrect = None, None
    for node in ast.parse(source).body:
        target, value = _assignment(node)
        if target == _MAPPING:
            mapping = _mapping(value, available)
        elif target == _INCORRECT_HUB_CLASS:
            incorrect = _string_set(value)
    if mapping is None or incorrect is None:
        return None
    return AutoTokenizerTables(mapping, incorrect)


def _assignment(node: ast.stmt) -> tuple[Optional[str], Optional[ast.expr]]:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id, node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id, node.value
    return None, None


def _mapping(value: Optional[ast.expr], available: Availability) -> Optional[dict]:
    # OrderedDict[str, str | None]([(model_type, class), ...]) or OrderedDict([...]).
    if not (isinstance(value, ast.Call) and len(value.args) == 1 and not value.keywords
            and isinstance(value.args[0], (ast.List, ast.Tuple))):
        return None
    mapping: dict = {}
    for pair in value.args[0].elts:
        if not (isinstance(pair, ast.Tuple) and len(pair.elts) == 2 and _is_string(pair.elts[0])):
            return None
        mapping[pair.elts[0].value] = _class_name(pair.elts[1], available)
    return mapping


def _class_name(node: ast.expr, available: Availability) -> Union[str, None, object]:
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, str)):
        return node.value
    if isinstance(node, ast.IfExp):
        condition = _availability_check(node.test)
        answer = available(condition) if condition is not None else None
        if answer is not None:
            return _class_name(node.body if answer else node.orelse, available)
    return UNKNOWN


def _availability_check(node: ast.expr) -> Optional[str]:
    """`is_x_available` where `node` is the call `is_x_available()`, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args and not node.keywords
            and node.func.id.startswith("is_") and node.func.id.endswith("_available")):
        return node.func.id
    return None


def _string_set(value: Optional[ast.expr]) -> Optional[frozenset]:
    if isinstance(value, ast.Set) and all(_is_string(e) for e in value.elts):
        return frozenset(e.value for e in value.elts)
    return None


def _is_string(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)

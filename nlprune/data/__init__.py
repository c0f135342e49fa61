"""Calibration and evaluation text: loading (Hub or local folder), token windows, and the
validation and out-of-distribution sets (heldout.py)."""

from .calibration import CalibrationSource, calibration_source
from .sources import (
    C4,
    DATA_DIR_ENV,
    DATASETS,
    WIKITEXT2,
    DataError,
    DatasetSpec,
    Texts,
    get_spec,
    hub_reachable,
    load_texts,
    resolve_data_dir,
    wikitext_rows,
)
from .windows import (
    CACHE_DIR_ENV,
    calibration_windows,
    eval_windows,
    resolve_cache_dir,
    tokenizer_fingerprint,
)
from .heldout import EVALUATION_SETS, HELDOUT, evaluation_windows, heldout_windows

__all__ = [
    "EVALUATION_SETS",
    "HELDOUT",
    "evaluation_windows",
    "heldout_windows",
    "C4",
    "CACHE_DIR_ENV",
    "CalibrationSource",
    "DATA_DIR_ENV",
    "DATASETS",
    "WIKITEXT2",
    "DataError",
    "DatasetSpec",
    "Texts",
    "calibration_source",
    "calibration_windows",
    "eval_windows",
    "get_spec",
    "hub_reachable",
    "load_texts",
    "resolve_cache_dir",
    "resolve_data_dir",
    "tokenizer_fingerprint",
    "wikitext_rows",
]

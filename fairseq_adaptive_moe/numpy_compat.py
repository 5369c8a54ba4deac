"""Let fairseq 0.12 run under NumPy 2 by restoring the few aliases it still uses.

fairseq (0.12.2 and fairseq-fixed 0.12.3.1) reads names that NumPy has since removed:

* ``np.compat.long`` (removed in NumPy 2.0): ``data/token_block_dataset.py`` (language modelling
  with ``--sample-break-mode eos`` and other break modes) and ``data/language_pair_dataset.py``
  (translation with ``--num-batch-buckets``);
* ``np.int`` / ``np.float`` (removed in NumPy 1.24): ``data/data_utils.py`` (span masking) and
  ``modules/dynamic_crf_layer.py``.

Each is restored as exactly what NumPy defined it to be before its removal (``np.compat.long``
and ``np.int`` were the builtin ``int``, ``np.float`` the builtin ``float``), and only where it is
missing: under an older NumPy nothing changes. No other NumPy name is touched.

Pinning NumPy instead cannot cover all three: ``np.int`` has been gone since 1.24, and no NumPy
before 1.24 ships wheels for every Python this plugin supports.
"""

import types

import numpy as np

#: name -> value, as NumPy defined them before removing them
_ALIASES = {"int": int, "float": float}
_COMPAT = {"long": int, "unicode": str, "integer_types": (int,), "basestring": str}


def _missing(name: str) -> bool:
    try:
        getattr(np, name)
    except AttributeError:  # NumPy >= 1.24 / 2.0 raises from its module __getattr__
        return True
    return False


def restore_numpy_aliases() -> list:
    """Define the removed aliases fairseq uses; returns the names it had to add."""
    added = []
    for name, value in _ALIASES.items():
        if _missing(name):
            setattr(np, name, value)
            added.append(f"np.{name}")
    if _missing("compat"):
        np.compat = types.SimpleNamespace(**_COMPAT)
        added.append("np.compat")
    return added


restore_numpy_aliases()

"""``python -m fairseq_adaptive_moe``: print the folder to pass to fairseq's ``--user-dir``.

Works from any directory once the plugin is installed (``pip install .`` or ``-e .``)::

    fairseq-train DATA --user-dir "$(python -m fairseq_adaptive_moe)" --arch adaptive_moe_transformer ...
"""

import os

import fairseq_adaptive_moe


def user_dir() -> str:
    """The plugin's package folder: what fairseq's ``--user-dir`` imports."""
    return os.path.dirname(os.path.abspath(fairseq_adaptive_moe.__file__))


if __name__ == "__main__":
    print(user_dir())

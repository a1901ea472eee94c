"""``python -m tumorseg``: the same app as the ``tumorseg`` script (used by torchrun)."""

from __future__ import annotations

from tumorseg.cli import main

if __name__ == "__main__":
    main()

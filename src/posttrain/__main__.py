"""``python -m posttrain ...`` (what ``accelerate launch -m posttrain`` and ``torchrun -m posttrain`` run)."""

from .cli import main

raise SystemExit(main())

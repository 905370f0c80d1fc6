"""``python -m medcycle`` (and ``torchrun -m medcycle train ...``) run the command line."""
from medcycle.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

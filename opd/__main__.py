"""`python -m opd ...`, as `opd ...`: what `accelerate launch -m opd train ...` runs in each process."""

from opd.cli import main

if __name__ == "__main__":
    main()

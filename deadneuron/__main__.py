"""``python -m deadneuron``: the command line, also under ``torchrun -m deadneuron`` (one process per rank)."""

from deadneuron.cli import main

if __name__ == "__main__":
    main()

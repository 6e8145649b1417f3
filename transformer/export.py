"""`python -m transformer.export`: the command is `transformer.cli.export` (`--help` says how)."""

from transformer.cli.export import main

if __name__ == "__main__":
    main()

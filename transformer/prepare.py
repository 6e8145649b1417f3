"""`python -m transformer.prepare`: the command is `transformer.cli.prepare` (`--help` says how)."""

from transformer.cli.prepare import main

if __name__ == "__main__":
    main()

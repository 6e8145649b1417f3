"""`python -m transformer.translate`: the command is `transformer.cli.translate` (`--help`
says how)."""

from transformer.cli.translate import main

if __name__ == "__main__":
    main()

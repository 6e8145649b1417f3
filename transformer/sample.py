"""`python -m transformer.sample`: the command is `transformer.cli.sample` (`--help` says how)."""

from transformer.cli.sample import main

if __name__ == "__main__":
    main()

"""The commands: `python train.py` (`cli.train`), `python -m transformer.sample`,
`transformer.translate`, `transformer.prepare`, `transformer.export`, `transformer.evaluate`.
`entry` is how each starts and ends (flags, `--help`, one-line errors and exit codes), `flags`
the parsing and help of the flags."""

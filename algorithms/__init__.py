"""One file per paper. Each module registers its Algorithm subclass with
`fedmed.register`; `fedmed.load_algorithms()` imports them all."""

"""clipdex: self-hosted visual search. This package is the composition root above the two sides: the
`clipdex` command (`cli`), `clipdex run` (a folder indexer and the search server in one process, on one
model), and the offline demo with its bundled model and image renderer (`demo`, `models/`, `synthetic`).

    clipdex ──▶ indexer (the write side)   ──▶ shared
            └─▶ tools   (the read side)    ──▶ shared

`indexer` and `tools` never import each other, and `shared` imports neither.
"""

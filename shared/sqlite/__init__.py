"""The SQLite backend: one SQLite file is the truth (`store`), each search process keeps a FAISS main +
delta index of it current (`index`) and searches that (`search`); the indexer compacts the FAISS files
(`indexer.compaction`). Embedded, one machine, any number of processes on it."""

"""`codegen2 data prepare`: filter, deduplicate, decontaminate and tokenize data into memory-mapped shards.

Modules: `filters` (code quality rules), `minhash` (signatures, LSH, clusters), `decontaminate` (benchmark
substrings), `steps` (the datatrove pipeline steps), `pipeline` (executors, resume, manifest), `shards`
(the shard format and the reader training uses).
"""

from codegen2.data.prepare.shards import PreparedData, ShardedStream

__all__ = ["PreparedData", "ShardedStream"]

"""Training data: sources (embedded corpus, directories, JSONL, Parquet, HF datasets), the held-out
split, the prepare stages and their token shards, the weighted packed mixture and the prefetching batch loader.

Modules: `documents` (Document, held-out split), `embedded` (the default corpus), `formats`
(user-data readers), `sources`, `prepare` (filter, dedup, decontaminate, tokenize into shards), `mixture`,
`loader`, `pipeline` (prepare_data: a run's data, always through `prepare`).
"""

from codegen2.data.documents import Document, is_heldout
from codegen2.data.loader import Batch, BatchLoader
from codegen2.data.mixture import PackedMixture
from codegen2.data.pipeline import prepare_data
from codegen2.data.sources import Source, data_sources, embedded_sources, heldout_documents, source_from_path

__all__ = ["Batch", "BatchLoader", "Document", "PackedMixture", "Source", "data_sources", "embedded_sources",
           "heldout_documents", "is_heldout", "prepare_data", "source_from_path"]

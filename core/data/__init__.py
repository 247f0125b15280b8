"""The data path: where records come from (``sources``: files, hub datasets, column
mappings; ``records``), records to tokenised examples through the registered data formats
(``formats``, ``fields``, ``examples``, ``tokenize``), built once in parallel into a
memory-mapped store in the cache (``build``, ``store``), sampled into mixtures (``mixture``) or
streamed (``streaming``), examples to batches (``batching``, ``packing``) and batches to
processes (``sharding``)."""

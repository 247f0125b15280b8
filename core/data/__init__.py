"""The data path: files to records (``records``), records to tokenised examples through the
registered data formats (``formats``, ``fields``, ``examples``, ``tokenize``), examples to
batches (``batching``, ``packing``) and batches to processes (``sharding``)."""

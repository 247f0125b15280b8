"""Commands beside training: ``align inspect`` (``inspect_data``), ``align plot`` (``plot``) and
``align merge`` (``merge``)."""

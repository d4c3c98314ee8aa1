"""Experiments as resumable stage pipelines (``pipeline``) over a locked work directory
(``workdir_lock``)."""

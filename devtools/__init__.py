"""Development tools shared by the tests, the benchmarks, the builder and the scripts: synthetic
songs (``songs``), stand-in checkpoints (``checkpoints``), local HTTP and S3 servers
(``servers``), free ports (``net``) and SNR (``metrics``). Never imported by the worker."""

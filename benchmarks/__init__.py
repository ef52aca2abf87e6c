"""Side-by-side speed benchmarks of jaxcnn against its peers; run as `python -m benchmarks.<name>`.

  train_step   steps/s of one optimizer step: jaxcnn (per call and inside one lax.scan, as `fit` trains)
               vs PyTorch (same architecture, batch, optimizer and initial weights) vs plain Flax linen
  ops          forward and forward+backward time of each fast op vs its reference twin vs torch
  epoch        end-to-end `experiments.mnist` run, compile time separated from training time

Contenders are interleaved round-robin within one run and reported as median and spread, because the
machine may be shared and absolute timings drift; compare ratios. Each benchmark writes a JSON result
(see benchmarks/README.md for the recorded tables). Not collected by pytest.
"""

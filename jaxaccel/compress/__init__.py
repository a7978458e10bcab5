"""Compression of trained models, as pure functions of models and weights.

  prune        magnitude masks (unstructured, channel), `execution_order`, `masked` optimizers
  saliency     pruning by other scores: SNIP (`snip_scores`, `score_masks`), `random_masks`
  schedules    sparsity schedules (one-shot, gradual, IMP) and rewinding
  dynamic      dynamic sparse training: SET / RigL drop-and-grow mask updates
  quant        fake quantization, observers, calibration, QAT
  fold         BatchNorm folded into the conv before it
  int8         real int8 inference (`convert_int8`, `int8_apply`)
  shrink       channel-pruned models made physically smaller
  cluster      weight sharing: 1-D k-means of a layer's kept weights (Deep Compression)
  huffman      canonical Huffman coding with a checksum, relative index coding of positions
  package      the compressed-package file format (`save_compressed`, `load_compressed`)
  export       StableHLO exports of inference functions
  layer_table  the per-layer compression report
  sensitivity  per-layer pruning / quantization sensitivity; per-layer sparsity + bits allocation
  sections     what a stage's `prune` / `quant` section means, as calls to the above

Importing the package imports none of them. Its modules import models, kernels, trees, io and
data (`DatasetSpec`); never config, stages, state, the loop or anything above.
"""

"""Recognition layer: detector -> crops -> embedder + gallery and/or classifier -> tag rerank -> open-set answer."""

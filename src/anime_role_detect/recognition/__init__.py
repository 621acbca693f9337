"""Recognition layer — detector -> crops -> embedder + gallery and/or classifier -> tag rerank -> open-set answer; imports base, registry, data, models."""

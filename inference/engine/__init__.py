"""The CPU development engine: a real tritonserver serving the TensorRT-LLM ensemble's interface."""

# Milliseconds between two streamed tokens, read by the engine (model.py) from
# the server's environment, which TritonDevServer(stream_token_interval_ms=)
# sets (0 unless told); `triton_dev` (make demo) passes this variable from its
# own environment or .env, or --stream-token-interval-ms. 0: as fast as the CPU goes
# (about 0.25 ms a token here); a GPU engine streams one every 10-30 ms. A
# demo that should look like one, or a test that must act while a stream
# runs, paces it.
STREAM_TOKEN_INTERVAL_ENV = "GYM_ENGINE_STREAM_TOKEN_INTERVAL_MS"

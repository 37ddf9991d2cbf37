"""Built-in methods. Each module is a plugin registered through the ``onnxq`` entry-point group,
exactly like a third-party package's."""

#: built-in plugin modules, in the order their entry points are declared in pyproject.toml
BUILTIN_PLUGINS = ("onnxq.plugins.minmax", "onnxq.plugins.percentile", "onnxq.plugins.mse", "onnxq.plugins.trt_entropy", "onnxq.plugins.calib_cache", "onnxq.plugins.easyquant", "onnxq.plugins.detptq", "onnxq.plugins.emb4bit", "onnxq.plugins.cfws", "onnxq.plugins.equalize", "onnxq.plugins.bias_correction", "onnxq.plugins.smoothquant", "onnxq.plugins.gptq", "onnxq.plugins.readers", "onnxq.tasks.builtin", "onnxq.backends.builtin")

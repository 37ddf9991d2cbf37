"""``python -m onnxq``: the same as the ``onnxq`` console script."""

from onnxq.cli.main import main

if __name__ == "__main__":
    main()

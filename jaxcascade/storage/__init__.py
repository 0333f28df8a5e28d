"""What is kept on disk between runs: model directories (`model_directory`), orbax checkpoints and weights
(`checkpoints`), and nicMSlesions' Keras models imported as model directories (`interop`).

May import `jaxcascade.networks` and below.
"""

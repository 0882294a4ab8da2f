"""The supervisor's parts: the model registry, its control socket, and the worker processes it starts and stops."""

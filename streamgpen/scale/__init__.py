"""Archives across GPUs and machines: videos cut into segments at key frames, enhanced by Ray
workers that each hold a warm enhancer, and joined losslessly (``streamgpen enhance --ray``).

Nothing here imports Ray at import time; :mod:`streamgpen.scale.ray_workers` does, when asked.
"""

"""Users' tasks built on the core: data, scorers and rewards, evaluation, demos and shipped models.

A task may import anything from the core (``paths``, ``sampling``, ``likelihood``, ``rollout``,
``models``, ``trainer``, ``rewards``); the core never imports a task. A task's rewards reach
``dflow_trl.rewards.get_reward_function`` through the ``dflow_trl.rewards`` entry points declared in
``pyproject.toml``, and ``tests/test_layout.py`` checks the direction of the arrows.

- ``shapeworld``: the embedded synthetic GenEval-like text-to-image and understanding task and the
  model that ships with the package.
"""

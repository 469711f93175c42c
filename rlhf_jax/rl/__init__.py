"""Reinforcement learning from a reward: the engine (generate → score → advantages →
update), advantage estimators, KL control and losses."""

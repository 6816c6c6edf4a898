"""Evaluations that run on a trained model: multiple-choice scoring."""

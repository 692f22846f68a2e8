"""mmgym.envs"""

"""mmgym.algos"""

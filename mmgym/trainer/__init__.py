"""mmgym.trainer"""

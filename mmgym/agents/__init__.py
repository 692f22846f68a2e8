"""mmgym.agents"""

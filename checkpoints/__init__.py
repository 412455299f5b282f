"""glassbox.checkpoints"""

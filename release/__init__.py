"""glassbox.release"""

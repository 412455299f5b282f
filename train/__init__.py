"""glassbox.train"""

"""zeroshot"""

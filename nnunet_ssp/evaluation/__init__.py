"""Evaluation of nnU-Net predictions: nnU-Net's 3D Dice, HD95 and clinical measures (``nnunet_ssp evaluate``).

``clinical`` holds the pure metric functions, ``evaluate`` the folder evaluation and the JSON it writes.
"""

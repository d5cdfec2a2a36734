def unfreeze_lambda(model, method):
    pass

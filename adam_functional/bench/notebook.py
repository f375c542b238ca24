# fmt: off
# mypy: allow-untyped-defs
"""The seed notebook's ``Adam`` class: the baseline of the benchmark's ratios.

The class is the notebook's code cell token for token; only trailing whitespace was removed. The
formatter is off (``# fmt: off``) and no annotations are added, so that the baseline runs the code
the notebook runs. Its docstring example needs the notebook's variables: it is not a doctest.
"""

import numpy as np


class Adam:
    """
    Adam (Adaptive Moment Estimation) optimizer implemented from scratch using NumPy.

    Adam combines the advantages of two other extensions of stochastic gradient descent:
    - Adaptive Gradient Algorithm (AdaGrad) that maintains per-parameter learning rates
    - Root Mean Square Propagation (RMSProp) that maintains a moving average of squared gradients

    Parameters:
    -----------
    lr : float, optional
        Learning rate (step size) for weight updates (default: 0.001)
    beta1 : float, optional
        Exponential decay rate for the first moment estimates (default: 0.9)
    beta2 : float, optional
        Exponential decay rate for the second moment estimates (default: 0.999)
    eps : float, optional
        Small constant for numerical stability (default: 1e-8)
    weight_decay : float, optional
        L2 regularization coefficient (default: 0.0)

    Examples:
    --------
    >>> optimizer = Adam(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.01)
    >>> optimizer.step(weights, gradients)
    """

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weight_decay = weight_decay

        # Dictionary to store first moment (momentum) for each parameter set
        self.m = {}
        # Dictionary to store second moment (uncentered variance) for each parameter set
        self.v = {}
        # Dictionary to store step count for bias correction
        self.t = {}

    def step(self, params, grads):
        """
        Perform a single Adam optimization step.

        Parameters:
        -----------
        params : numpy.ndarray
            Model parameters (weights) to be updated (modified in-place)
        grads : numpy.ndarray
            Gradients with respect to the parameters

        Algorithm:
        ----------
        1. Apply weight decay if enabled: g_t = g_t + weight_decay * w_t
        2. Update biased first moment estimate: m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
        3. Update biased second raw moment estimate: v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
        4. Compute bias-corrected first moment: m_hat_t = m_t / (1 - beta1^t)
        5. Compute bias-corrected second moment: v_hat_t = v_t / (1 - beta2^t)
        6. Update parameters: w_t = w_{t-1} - lr * m_hat_t / (sqrt(v_hat_t) + eps)
        """
        # Get unique identifier for this parameter set
        param_id = id(params)

        # Initialize moment estimates and step count if not exists
        if param_id not in self.m:
            self.m[param_id] = np.zeros_like(params)
            self.v[param_id] = np.zeros_like(params)
            self.t[param_id] = 0

        # Increment step count
        self.t[param_id] += 1
        t = self.t[param_id]

        # Apply L2 regularization (weight decay) to gradients
        if self.weight_decay > 0:
            grads = grads + self.weight_decay * params

        # Update biased first moment estimate
        # m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
        self.m[param_id] = self.beta1 * self.m[param_id] + (1 - self.beta1) * grads

        # Update biased second raw moment estimate
        # v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
        self.v[param_id] = self.beta2 * self.v[param_id] + (1 - self.beta2) * (grads ** 2)

        # Compute bias-corrected first moment estimate
        # m_hat_t = m_t / (1 - beta1^t)
        m_hat = self.m[param_id] / (1 - self.beta1 ** t)

        # Compute bias-corrected second raw moment estimate
        # v_hat_t = v_t / (1 - beta2^t)
        v_hat = self.v[param_id] / (1 - self.beta2 ** t)

        # Update parameters
        # w_t = w_{t-1} - lr * m_hat_t / (sqrt(v_hat_t) + eps)
        params[:] = params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

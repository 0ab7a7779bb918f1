"""Per-sample gradients of the selected parameters with torch.func (functional_call, grad, vmap).

Each example's loss is the diffusion loss with its own timestep and noise draw. Only the selected
parameters are differentiated; the frozen ones enter as constants. Memory is bounded by the size of
one physical micro-batch, whatever the logical batch.
"""

from torch.func import functional_call, grad, vmap


def per_sample_grads(unet, diffusion, params, z0, y, t, noise):
    """Gradients of each example's loss w.r.t. `params`.

    params: {name: tensor} selected parameters; z0, noise: (b, z, h, w) latents and noise draws;
    y: (b,) labels; t: (b,) timesteps. Returns {name: (b, *param.shape)}.
    """
    frozen = {n: p.detach() for n, p in unet.named_parameters() if n not in params}
    buffers = dict(unet.named_buffers())

    def loss_one(p, z0_i, y_i, t_i, noise_i):
        def model(x, t, y):
            return functional_call(unet, ({**frozen, **p}, buffers), (x, t, y))
        return diffusion.loss_per_example(model, z0_i[None], y_i[None], t_i[None], noise_i[None])[0]

    detached = {n: p.detach() for n, p in params.items()}
    return vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(detached, z0, y, t, noise)

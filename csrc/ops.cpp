// Every schema of the alexnet_fast op library, in one place. Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels and autograd are registered from Python
// in alexnet_fast/ops.py and autograd.py. There is no Autocast kernel: the public Python ops cast
// the conv's operands under autocast (ops.py says why).
#include <Python.h>
#include <torch/library.h>

#define ALEXNET_FAST_STR_(x) #x
#define ALEXNET_FAST_STR(x) ALEXNET_FAST_STR_(x)
#ifdef ALEXNET_FAST_CUDA_ARCHS
#define ALEXNET_FAST_CUDA_ARCHS_STR ALEXNET_FAST_STR(ALEXNET_FAST_CUDA_ARCHS)  // e.g. "9.0_10.0"
#else
#define ALEXNET_FAST_CUDA_ARCHS_STR ""
#endif

// `import alexnet_fast._C` loads this library (and with it the TORCH_LIBRARY registrations).
// The ops are reached through torch.ops.alexnet_fast; the module holds only what the build was.
static PyObject* build_info(PyObject*, PyObject*) {
#ifdef ALEXNET_FAST_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
#ifdef ALEXNET_FAST_DEBUG
  PyObject* debug = Py_True;
#else
  PyObject* debug = Py_False;
#endif
  return Py_BuildValue("{s:O,s:s,s:O}", "with_cuda", with_cuda, "cuda_archs", ALEXNET_FAST_CUDA_ARCHS_STR,
                       "debug", debug);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built (CUDA kernels, archs, debug)."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(alexnet_fast, m) {
  // relu(conv2d(x, weight, bias, stride, padding)), groups=1, dilation=1.
  m.def("conv2d_relu(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding) -> Tensor");
  // Gradients take the forward's output: the ReLU mask (out > 0) is applied to grad_out inside.
  m.def(
      "conv2d_relu_backward_input(Tensor grad_out, Tensor out, Tensor weight, int[2] input_hw, "
      "int[2] stride, int[2] padding) -> Tensor");
  // Returns (grad_weight, grad_bias); grad_bias is the sum of the masked gradient.
  m.def(
      "conv2d_relu_backward_weight(Tensor grad_out, Tensor out, Tensor x, int[2] kernel_hw, "
      "int[2] stride, int[2] padding) -> (Tensor, Tensor)");
  // The same op through cuDNN (CUDA only): its fused conv+bias+ReLU forward, and one backward for
  // all three gradients (output_mask: x, weight, bias; an output not asked for is empty), which
  // applies the ReLU mask once.
  m.def("conv2d_relu_cudnn(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding) -> Tensor");
  m.def(
      "conv2d_relu_cudnn_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, int[2] stride, "
      "int[2] padding, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The backward of relu(conv + bias) at the ReLU: (threshold_backward(grad_out, out, 0), its sum
  // per channel, the bias gradient), in one pass where the layout allows (channels_last on CUDA).
  m.def("relu_backward_bias(Tensor grad_out, Tensor out) -> (Tensor, Tensor)");

  // torch.nn.functional.local_response_norm. Backward recomputes the denominator from x, which
  // the preceding conv2d_relu keeps anyway, so LRN saves no tensor of its own.
  m.def("lrn(Tensor x, int size, float alpha, float beta, float k) -> Tensor");
  m.def("lrn_backward(Tensor grad_out, Tensor x, int size, float alpha, float beta, float k) -> Tensor");

  // torch.nn.functional.max_pool2d. indices: uint8 window-local offset (kh * kernel_w + kw) of
  // the element each output took.
  m.def(
      "max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode) "
      "-> (Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad_out, Tensor indices, int[2] input_hw, int[2] kernel_size, "
      "int[2] stride, int[2] padding) -> Tensor");

  // max_pool2d(lrn(x)) with padding 0, ceil_mode False; the LRN output never reaches memory.
  m.def(
      "lrn_max_pool2d(Tensor x, int size, float alpha, float beta, float k, int[2] kernel_size, "
      "int[2] stride) -> (Tensor, Tensor)");
  m.def(
      "lrn_max_pool2d_backward(Tensor grad_out, Tensor x, Tensor indices, int size, float alpha, "
      "float beta, float k, int[2] kernel_size, int[2] stride) -> Tensor");
  // For x = relu(z): lrn_max_pool2d_backward passed back through the ReLU (zero where x <= 0)
  // and its sum per channel, i.e. (grad z, grad of a bias added to z), in one pass on CUDA
  // (channels_last), so that a convolution's backward can take them as they are.
  m.def(
      "lrn_max_pool2d_backward_relu(Tensor grad_out, Tensor x, Tensor indices, int size, float alpha, "
      "float beta, float k, int[2] kernel_size, int[2] stride) -> (Tensor, Tensor)");

  // PyTorch's SGD step (torch.optim.SGD's arithmetic) over float32 parameters, which also writes
  // each parameter's bfloat16/float16 copy (copies: empty for none; momentum_buffers: empty
  // without momentum). first_step: the buffers are set to the gradient (csrc/sgd.h).
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] copies, "
      "float lr, float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, "
      "bool first_step) -> ()");
}
